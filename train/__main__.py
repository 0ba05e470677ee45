"""``python -m train --config train/configs/<recipe>.py --workdir runs/<name>``."""

from train import main

main.run()
