"""serve: llama-server started on a placed model, warmed up with one streamed request, stopped cleanly."""
