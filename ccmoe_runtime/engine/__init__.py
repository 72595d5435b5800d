"""The llama.cpp engine: builds cached by commit + backend + flags, the self-test that proves a build runs here,
the one module that runs llama.cpp's tools and reads their output, ggml through ctypes, the server process."""
