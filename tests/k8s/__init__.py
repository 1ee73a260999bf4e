"""A generic Kubernetes simulation for tests: real control-plane programs as local processes, a
mini kubelet that runs pods as real processes or containers, and the clients to talk to them.

Nothing here knows the product: what runs in a pod, which images exist and which environment a
process gets are the caller's settings (tests/support/e2e.py configures it for dsm). Modules:

- ``controlplane``: etcd, kube-apiserver and, on request, kube-controller-manager,
  kube-scheduler and kwok (a fake node whose pods turn Ready when scheduled), all on 127.0.0.1,
  built from source by hack/k8s/build.sh; an admin kubeconfig; component logs.
- ``certificates``: the control plane's throw-away PKI (CA, serving, admin client, service-account
  key), made with tests/support/pki.py.
- ``plugin``: the pytest plugin: ``k8s_control_plane``, ``k8s_workloads``, ``k8s_namespace``
  fixtures, one control plane per session, component logs attached to failing tests, one loud
  line (or a failure with ``CI=true``) when the binaries are missing.
- ``kubeapi``: a small thread-safe REST client (server-side apply, merge patches, watches).
- ``kubelet``: the mini kubelet: registers a Node, runs the pods bound to it as local processes
  (or podman containers), probes them for real, restarts, terminates with grace.
- ``containers``: how a pod's container becomes ``podman run`` (securityContext, volumes, env).
- ``podwatch``: records a namespace's pod events in API order, for ordering assertions.
- ``audit``: the API server's audit log read back (who deleted which pod, with which uid
  precondition).

Its own tests: tests/unit/test_k8s_*.py (the pure parts) and tests/cluster/test_kubelet.py,
test_kwok.py, test_tools.py (against the real control plane).
"""
