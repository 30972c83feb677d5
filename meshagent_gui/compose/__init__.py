"""Composition above the core: an agent started together with the reference server.

The core (``meshagent_gui.core``) never imports the server (``meshagent_gui.server``), and the
server shares only wire types with the core. A one-computer mesh needs both: the embedded server
(``local_mesh``) and the agent enrolled on it, started the way a front end needs it
(``onboarding``). That composition lives here, one layer above both, where both are visible;
the front ends (``cli.py``, ``ui/``) call it.
"""
