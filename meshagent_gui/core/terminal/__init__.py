"""Terminal share: a PTY shared with viewers (preview by default, one controller at a time).

- :mod:`.pty` the PTY interface and factory (:mod:`.pty_unix`, :mod:`.conpty_windows`);
- :mod:`.screen` the host's screen model (avt) and its off-hot-path tracker;
- :mod:`.host` the session host: composes the rest; output offsets, floods, sizes, control;
- :mod:`.viewer` one viewer's queue, resyncs and stream; :mod:`.replay` the output kept for
  resumes; :mod:`.recorder` the asciicast recording;
- :mod:`.sanitize` what a viewer's terminal must never see (queries, clipboard writes).

The wire messages and the control rules (a sans-IO table) are in
:mod:`meshagent_gui.core.protocol.terminal`.
"""
