"""Small synthetic datasets in the real COCO and ADE20K layouts, for demos and tests."""
