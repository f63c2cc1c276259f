"""moerun runtime layer."""
