"""moerun cluster layer."""
