"""The quickstart: phantom -> TFRecords -> train -> evaluate in one folder."""
