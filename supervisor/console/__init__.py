"""The VM console: a PTY the supervisor owns, shown in the user's terminal and on console.sock.

The public surface is three modules; the others are the console's own parts:

- `hub`: `Console` (the PTY's master fanned out to the attached terminal, replay and log),
  `bind_console_socket`;
- `settings`: `ConsoleSettings`, `parse_escape_key` (no PTY or thread code: planning imports it);
- `terminal`: the PTY, window sizes, raw mode (what `vm` opens before it starts QEMU).

Parts: `escape` (the escape key and the one table of its commands, for `run` and `attach`),
`attach` (the `attach` client), `filter` (the hostile-output filter, with its C fast path
`_scan.c`), `modes` (the terminal modes the guest switched on), `log` (replay buffer, console
log), `output` (the output pump thread and its sinks), `protocol` (console.sock's frames).

Importing this package imports nothing: planning must not pull in PTY and thread code.
"""
