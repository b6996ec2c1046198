"""The counterfactual montage: slices of unequal shape sit centred in equal cells, padded with their panel's background."""

import numpy as np
import torch
from PIL import Image

from scripts.io.pictures import counterfactual_montage


def test_montage_of_a_non_cubic_volume_is_a_regular_grid(tmp_path):
    shape = (1, 8, 12, 6)  # axial 12x8, coronal 6x8, sagittal 6x12 (rows x columns as shown)
    original = torch.full(shape, 0.5)
    difference = torch.full(shape, 1.0)  # saturates red
    path = counterfactual_montage(tmp_path / "m.png", original, original, difference, (0.0, 1.0), torch.ones(shape))
    picture = np.asarray(Image.open(path))
    cell = 12 + 2  # the largest slice plus the 2-pixel gap
    scale = -(-384 // (3 * cell))
    assert picture.shape == (3 * cell * scale, 4 * cell * scale, 3)
    grid = picture[::scale, ::scale]

    def panel(row, column):
        return grid[row * cell : row * cell + 12, column * cell : column * cell + 12]

    coronal_input, coronal_difference, sagittal_mask = panel(1, 0), panel(1, 2), panel(2, 3)
    # the coronal slice (6 rows x 8 columns) is centred: 3 padding rows above, 2 padding columns left
    assert (coronal_input[:3] == 0).all() and (coronal_input[3:9, 2:10] == 127).all() and (coronal_input[9:] == 0).all()
    assert (coronal_difference[:3] == 255).all() and (coronal_difference[:, :2] == 255).all()
    assert (coronal_difference[3:9, 2:10] == [255, 0, 0]).all()
    assert (sagittal_mask[3:9] == 255).all() and (sagittal_mask[:3] == 0).all()
    # every row is the same width: no row ends in a black strip where another has a panel
    assert (panel(0, 3)[:, 2:10] == 255).all() and (panel(2, 3)[3:9, :] == 255).all()
