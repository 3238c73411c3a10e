"""A stand-in peer for tests/test_benchmarks.py: serves benchmarks/peers/protocol.py with a step
that counts its calls. `python -m fake_peer_worker DIR`; DIR/mode is 'ok', 'crash' (exits
before it is ready) or 'die' (exits at the first command)."""
import os
import sys
import time

from benchmarks.peers import protocol


def main(directory):
  with open(os.path.join(directory, 'mode')) as f:
    mode = f.read().strip()
  if mode == 'crash':
    sys.exit('fake peer: crashed while building')
  print('a line of the worker\'s own output')
  calls = []

  def step():
    calls.append(1)
    time.sleep(0.002)
    if mode == 'die':
      os._exit(3)
    return len(calls)

  protocol.serve(step, lambda _: None, {'name': 'fake', 'device': 'cpu'},
                 lambda: {'calls': len(calls)})


if __name__ == '__main__':
  main(sys.argv[1])
