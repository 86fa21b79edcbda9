"""The numbered migrations (NNNN_name.sql), shipped inside the package as ``pgsched.sql``."""
