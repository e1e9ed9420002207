"""Built-in prompt libraries: data, installed as clipeval.libraries (see README.md here)."""
