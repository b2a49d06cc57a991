"""fusion: persistent, multi-turn LLM agent conversations from the command line."""

__version__ = "0.1.0"


def __getattr__(name: str):  # the library API, imported on first use to keep start-up fast
    if name in ("create_session", "Session"):
        from . import session

        return getattr(session, name)
    if name == "ChatMessage":
        from .messages import ChatMessage

        return ChatMessage
    raise AttributeError(name)


__all__ = ["ChatMessage", "Session", "create_session", "__version__"]
