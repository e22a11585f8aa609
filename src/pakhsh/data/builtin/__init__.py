"""Built-in datasets that need no download: procedural shapes, Fashion-MNIST (Debian package), sklearn
digits and crops of the sample photos shipped with scikit-image/scikit-learn/matplotlib.

Import the modules directly (`pakhsh.data.builtin.shapes`); this package imports nothing heavy itself.
"""
