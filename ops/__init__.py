"""moerun ops layer."""
