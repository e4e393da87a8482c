"""Kubernetes' CRI API (runtime.v1), made by ``tests/containerd/generate-cri-api``: a kubelet's calls, for the tests."""
