"""The blocks that methods assemble: spatial transforms, affine parameterisations, B-splines, networks, losses, ANTs."""
