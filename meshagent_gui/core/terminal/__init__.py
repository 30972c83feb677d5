"""Terminal share: a PTY shared with viewers (preview by default, one controller at a time).

- :mod:`.pty` the PTY interface and factory (:mod:`.pty_unix`, :mod:`.conpty_windows`);
- :mod:`.screen` the host's screen model (avt) and its off-hot-path tracker;
- :mod:`.host` the session host: output offsets, viewer queues, snapshots, control, recording;
- :mod:`.sanitize` what a viewer's terminal must never see (queries, clipboard writes).

The wire messages are in :mod:`meshagent_gui.core.protocol.terminal`.
"""
