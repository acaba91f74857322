"""Starts gcp-storage-emulator (a local GCS JSON API) in a form tensorstore can use.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=NAME

Real GCS sends an object's generation in the `x-goog-generation` header of every media download;
the emulator (checked with 2026.7.19) does not. tensorstore's GCS driver then records generation 0
for what it read, and its next conditional read or write of that object fails with "Malformed
StorageGeneration" (seen on OCDBT's manifest.ocdbt during Orbax saves of a few hundred arrays).
This adds the header from the object's own metadata, and changes nothing else. The patch must land
before the emulator's server module is imported: its handler table keeps the original function.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (200, 206):
    meta = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(meta['generation'])
    response['x-goog-metageneration'] = str(meta['metageneration'])


objects.download = _download_with_generation

if __name__ == '__main__':
  from gcp_storage_emulator.__main__ import main  # imports the server, after the patch
  main(sys.argv[1:])
