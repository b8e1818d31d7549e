"""Registration: transforms, displacement fields, and registration engines.

Conventions (shared by every module here):

* World coordinates are RAS millimetres, as in nibabel. Files in ITK/ANTs formats are LPS;
  the conversion happens only in :mod:`smoulder.registration.itk`.
* A transform maps points of the *fixed* (reference) space to points of the *moving* space — a
  pull-back, as ITK and ANTs transforms do — so resampling the moving image onto the fixed grid
  samples it at ``T(x_fixed)``.
* Modules: ``fields`` (voxel-unit displacement arrays), ``transforms`` (affine, displacement and
  chained transforms on world points, resampling with one interpolation, Jacobians), ``itk``
  (file formats), ``engines`` (registration algorithms behind one ``register`` function).
"""

#: Registration engines a user may choose (``auto``: torch on CUDA, else greedy). The one list
#: the configuration, the command line and the Nipype interfaces check against; kept here, free
#: of heavy imports, so that reading it does not load PyTorch.
ENGINES = ("auto", "greedy", "torch", "fireants", "ants")
