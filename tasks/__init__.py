"""Pipeline stages, one module each, and the libraries they share."""
