/* Every wire format's route table; a new format adds its file and one line here. */
#include "sim.h"

const pq_sim_route_t *const pq_sim_route_tables[] = {
    pq_sim_openai_routes,
    NULL,
};
