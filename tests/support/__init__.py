"""The test kit: what tests of every tier share. Each module's docstring says what it offers.

Generic (no knowledge of dsm; tests/k8s builds on these): ``waiting`` (``wait_until``, the one
polling helper), ``loopback`` (``free_port``, ``next_address``), ``pki`` (the one certificate
builder), ``processes`` (``ChildProcess``: a program with its own log file), ``buildcache``
(where ``make`` leaves the programs the tests run).

The product: ``postgres`` (the PostgreSQL plugin), ``nodes`` (``NodeProcess``, the one node
launcher; ``Cluster``), ``jobtypes`` and ``periodic`` (job types loaded into test nodes),
``effects`` (what transactional test jobs did), ``schema`` (a readable schema snapshot),
``access`` (who may call which route), ``dsmcli`` (the ``dsm`` command as a subprocess),
``rawhttp`` and ``tcpproxy`` (hostile clients and broken links), ``chaos`` (seeded fault
injection), ``operator`` (the operator in the cluster tier), ``e2e`` (the operator and real
nodes in the e2e tier), ``images`` (the project's images), ``prometheus`` (promtool, Prometheus
and the monitoring files).
"""
