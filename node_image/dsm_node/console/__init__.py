"""The administrator's console: HTML pages served by every node on its HTTPS port, at ``/``.

Shaped like the original product's console: Administration > Manager Nodes (each node's status,
its properties, Decommission) and Administration > System Information (the four graphs over the
last hour), plus alerts, the audit log and agents. Any node serves any page: sessions live in the
shared database, so an administrator behind a load balancer never notices which node answered.

Layers, from pure to I/O (the pure ones import nothing that does I/O and are unit-tested):

- ``views``: view models from records (statuses with their icon and words, ages, counts);
- ``charts``: the System Information graphs as SVG, pure functions from counts to markup;
- ``security``: cookie, CSRF token, Origin and response-header rules;
- ``reading``: what a page needs, read through the API's database gateways;
- ``pages``: the route table (each route names its least role) and the handlers;
- ``guarding``: the console's half of the API's guard middleware (session cookie, Origin, CSRF,
  role, HTML errors, security headers on every response).

Every asset (templates, CSS, the one script, icons) ships inside this package: the console works
air-gapped. The script only refreshes marked regions of a page by fetching the page again; there
is no inline script anywhere, so the Content-Security-Policy forbids all inline script.
"""
