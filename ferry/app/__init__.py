"""The drawing application (`ferry draw`): a Tk window and the stroke canvas behind it. It depends on
the runtime (ferry.runtime), never the other way round."""
