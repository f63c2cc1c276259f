"""moerun launch layer."""
