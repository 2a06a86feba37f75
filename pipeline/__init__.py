"""The DUDCH Kubeflow pipeline and the `dudch` command line."""
