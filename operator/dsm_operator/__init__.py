"""The DSM operator: turns one ``DeepSecurityManager`` resource into a running multi-node manager.

Layers, from the inside out (an inner layer never imports an outer one):

* ``reconcile`` -- pure: the spec model, what the children look like (``manifests``), what to do
  next (``planning``), how the status reads (``conditions``, ``statuses``). No I/O, no kopf.
* ``gateways`` -- all I/O: the Kubernetes API (``kubeapi``) and the nodes' HTTPS API (``nodeapi``).
* ``handlers`` -- thin kopf registrations that gather the world through the gateways, ask
  ``reconcile`` what to do, and do it.
* ``main`` -- the console script; importing it registers the handlers.

See docs/operator-design.md for the reasoning behind the launch, scale and upgrade design.
"""
