"""Pure-torch building blocks shared by models: nms, priors, box codecs, image io."""
