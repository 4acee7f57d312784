"""VNC in Domain R: the sans-I/O RFB server core (rfb), its encodings and pixel
translation, keysym → Linux keycode mapping; the asyncio adapter lives in server.py."""
