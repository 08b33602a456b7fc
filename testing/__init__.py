"""Test harness shipped with the project (as kopf ships ``kopf.testing``): real Kubernetes parts
started from binaries built by ``scripts/build-k8s-tools.sh``, for the test suite, the benchmarks
and ``make cluster-up``."""
