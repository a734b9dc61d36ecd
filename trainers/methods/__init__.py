"""The personalization methods: small variations of the one loop (``base.Method``)."""
