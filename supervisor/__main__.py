try:
    from supervisor.cli import entry
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: nothing has started yet
    raise SystemExit(130) from None

entry()
