"""Registration: transforms, displacement fields, and registration engines."""
