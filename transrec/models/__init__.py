"""Models: item encoders (text, image, video, ID), user encoders and losses; tensors and configs only."""
from transrec.models.image_encoder import ImageItemEncoder
from transrec.models.item_encoders import ITEM_ENCODERS, IDItemEncoder, MoMItemEncoder
from transrec.models.losses import LOSSES
from transrec.models.text_encoder import TextItemEncoder
from transrec.models.transrec import TransRec
from transrec.models.user_encoder import USER_ENCODERS
from transrec.models.video_encoder import VideoItemEncoder

__all__ = [
    "ITEM_ENCODERS",
    "LOSSES",
    "USER_ENCODERS",
    "IDItemEncoder",
    "ImageItemEncoder",
    "MoMItemEncoder",
    "TextItemEncoder",
    "TransRec",
    "VideoItemEncoder",
]
