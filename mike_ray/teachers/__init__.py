"""Teacher zoo (train, store, load) and the TeacherShard actor that serves frozen teachers."""
