"""Media I/O: video files in and out (video.py, PyAV), still images (images.py, Pillow), frame-rate
resampling (resample.py) and the built-in sample clip (sample.py). Import from the module that owns a name:
this package imports nothing itself, so naming one module never loads PyAV or Pillow for another."""
