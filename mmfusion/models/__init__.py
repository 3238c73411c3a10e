"""Model code: pure Flax modules. Importing the package registers the built-in tower types."""
from mmfusion.models import audio as _audio  # noqa: F401  (tower type 'ast')
from mmfusion.models import text as _text  # noqa: F401  (tower type 'text')
from mmfusion.models import vit as _vit    # noqa: F401  (tower type 'vit')
