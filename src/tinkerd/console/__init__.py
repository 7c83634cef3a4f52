"""The web console: static pages served by tinkerd at /console, and a small JSON API over the store they read.

Pages sign in with an API key kept in the browser's session storage and send it as the SDK does (``X-API-Key``);
no cookies. Actions and sampling go through the Tinker API itself (``/api/v1``), so the console can do nothing a
client of that key could not. No torch here: the tokenizer for the sampling playground is loaded lazily.
"""

from tinkerd.console.app import CONSOLE_PATH, ConsoleConfig, mount_console

__all__ = ["CONSOLE_PATH", "ConsoleConfig", "mount_console"]
