"""Apps that the tests run real workers on (``--app tests.apps.sample:app``)."""
