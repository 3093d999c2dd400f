"""Small C kernels for the CPU path, built once per machine with its C compiler and called through ctypes."""
