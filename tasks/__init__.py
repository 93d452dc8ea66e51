"""One module per external system: @task functions that do I/O, beside pure analysis functions."""
