from .decode import DecodePolicy as DecodePolicy
from .decode import decode_image as decode_image
from .listing import SplitListing as SplitListing
from .listing import list_split as list_split
from .names import fs_path as fs_path
from .names import printable_path as printable_path
