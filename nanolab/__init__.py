"""nanolab's machinery: what the scripts at the repository's root share (the README's map lists
each module)."""
