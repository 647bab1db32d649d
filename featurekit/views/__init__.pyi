from .augment import AugmentPolicy as AugmentPolicy
from .augment import ViewPlan as ViewPlan
from .augment import augment_policy as augment_policy
from .preprocessing import Preprocessing as Preprocessing
