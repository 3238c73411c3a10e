"""The special token ids every part that reads or writes token ids agrees on: the tokenizer
(which trains its models with them), the token towers, MLM masking and caption decoding.

Kept free of imports so that model code can use them without pulling in TensorFlow.
"""
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
FIRST_NORMAL_ID = 4   # ids from here on are pieces of text; below are the special ids above
