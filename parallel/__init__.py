"""moerun parallel layer."""
