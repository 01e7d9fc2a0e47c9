# fastckpt.ModelCheckpoint from R, through reticulate, the way R keras users call it:
# `period` (R keras / tf.keras 2.x) saves every 2 epochs.
#
# Usage: Rscript checkpoint_period.R <python with fastckpt, keras and tensorflow> <folder>

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 2) stop("usage: Rscript checkpoint_period.R PYTHON FOLDER")
python <- args[[1]]
folder <- args[[2]]

if (!requireNamespace("reticulate", quietly = TRUE)) {
  stop("the R package reticulate is missing: apt-get install -y r-cran-reticulate")
}
library(reticulate)
use_python(python, required = TRUE)

keras <- import("keras")
fastckpt <- import("fastckpt")

keras$utils$set_random_seed(1L)
model <- keras$Sequential(list(
  keras$Input(shape = list(4L)),
  keras$layers$Dense(8L, activation = "relu"),
  keras$layers$Dense(1L)
))
model$compile(optimizer = "adam", loss = "mse")

# The data is made in Python: Debian's reticulate (1.28) cannot convert R matrices to
# NumPy 2 arrays ("incompatible NumPy binary version").
np <- import("numpy", convert = FALSE)
x <- np$random$default_rng(1L)$random(list(16L, 4L), dtype = "float32")
y <- x$sum(axis = 1L, keepdims = TRUE)

checkpoint <- fastckpt$ModelCheckpoint(
  filepath = file.path(folder, "ckpt-{epoch:02d}.safetensors"),
  save_weights_only = TRUE,
  period = 2L,
  verbose = 1L
)
history <- model$fit(x, y, epochs = 4L, batch_size = 4L, verbose = 0L, callbacks = list(checkpoint))

cat("saved:", sort(list.files(folder)), "\n")
