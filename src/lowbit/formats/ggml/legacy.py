"""placeholder until the family lands."""
TYPES = ()
