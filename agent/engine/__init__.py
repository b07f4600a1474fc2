"""The llama.cpp owner: the only package that imports llama_cpp."""
