"""The Resultity node agent."""
