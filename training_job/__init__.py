"""Training side of mnist-mlops.

Importing this package must stay cheap and TensorFlow-free: the operator imports `spec`, `policy`,
`result` and `registry` from here, and its image carries no TensorFlow.
"""
