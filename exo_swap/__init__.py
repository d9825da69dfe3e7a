"""exo_swap: exo's routing (the libp2p-era `exo.routing`) swapped for p2p-reliable.

exo (github.com/exo-explore/exo, at the parent of "libp2p -> zenoh") talks to the network
only through three small modules and the Rust bindings `exo_rs`. This package replaces them:

| exo module                        | replaced by                         |
| --------------------------------- | ----------------------------------- |
| `exo.routing.router`              | `exo_swap.routing_router`           |
| `exo.routing.topics`              | `exo_swap.routing_topics`           |
| `exo.routing.connection_message`  | `exo_swap.routing_connection_message` |
| `exo_rs` (Pidfile only now)       | `exo_swap.exo_rs_standin`           |

`python -m p2pr.exo.apply --exo-src DIR` installs them in an exo checkout (kept outside
this repository); `python -m p2pr.exo.check --exo-src DIR` runs exo's tests bare and
swapped and a live 3-node exo cluster. exo's own source is never copied here.
"""
